"""The toy world: a LLaVA-1.5 small enough to train on a CPU in minutes, on scenes whose truth is known.

world.py draws the scenes and their texts, splits.py builds POPE-style evaluation sets, train.py trains the
model (python -m minidamro.toy train), lab.py measures hallucination per decoding method
(python -m minidamro.toy eval). The trained checkpoint ships in model/ and is generate's default model.
"""
import os

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
