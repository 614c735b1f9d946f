"""ciae"""
