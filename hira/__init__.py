"""hira: the HiRA family as a registered PEFT tuner."""
