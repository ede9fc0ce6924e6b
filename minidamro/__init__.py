"""minidamro: LLaVA-1.5, LLaVA-NeXT, InstructBLIP and DAMRO (Gong et al., EMNLP 2024) in short PyTorch modules."""
import warnings

# minidamro never uses numpy and does not require it (requirements.txt), but torch warns that it could not load
# it the first time some of its own modules are imported. Silence exactly that message: a first run's screen
# should hold the answer and minidamro's own notes only.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)


class MinidamroError(Exception):
    """A problem with the user's input (checkpoint, image, option). The command line prints it as one line."""
