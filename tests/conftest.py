import sys
from pathlib import Path

# tests/checkpoints.py and friends are imported as top-level helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
