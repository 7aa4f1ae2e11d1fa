"""Shared fixtures for the zoo tests; nothing here may touch the network."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
