"""Talking to other nodes: SSH fan-out and SFTP copies (paramiko)."""
