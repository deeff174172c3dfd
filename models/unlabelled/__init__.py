"""unlabelled"""
