"""llava.demo"""
