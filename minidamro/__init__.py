"""minidamro: LLaVA-1.5 and DAMRO (Gong et al., EMNLP 2024) in a few short PyTorch modules."""


class MinidamroError(Exception):
    """A problem with the user's input (checkpoint, image, option). The command line prints it as one line."""
