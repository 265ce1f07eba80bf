import sys
from pathlib import Path

# tests import their reference helpers (reference_losses.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))
