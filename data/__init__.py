"""Data stages around filtering: download (img2dataset), embed, reshard."""
