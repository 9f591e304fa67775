"""Wild-audio simulation: clean speech through the acoustic conditions Mega-ASR was trained for.

Needs the 'calib' extra (scipy, pyroomacoustics; matplotlib for previews).
"""
