"""Offline trainer (TRL + PEFT): SFT, DPO, reward model and GenARM autoregressive RM."""
