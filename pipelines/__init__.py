"""The four stages (understand, generate, render, compose) and the in-process pipeline. Never imports Ray."""
