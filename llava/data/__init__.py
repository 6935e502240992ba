"""llava.data"""
