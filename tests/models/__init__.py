"""Attention code written the way real model families write it (shapes and spellings of their sources),
small enough for CPU tests. None of the libraries they mimic is needed."""
