"""llava.model"""
