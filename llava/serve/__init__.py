"""llava.serve"""
