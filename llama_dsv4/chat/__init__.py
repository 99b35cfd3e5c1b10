"""Chat formats for DeepSeek V4 (templates live in chat/templates/)."""
