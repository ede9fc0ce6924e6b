"""The CPU kernels behind the model core's linear layers and decoder attention.

cpu.py says what this CPU and torch build can run; linear.py and attention.py hold the exact formulations
and time them; choices.py keeps each measured decision once per machine, and the reference mode.
"""
