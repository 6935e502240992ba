"""llava.train"""
