"""What a result was measured on: versions, device, command, commit."""
import datetime
import os
import platform
import subprocess
import sys

import torch

import fastssl



def environment():
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastssl": fastssl.__version__,
        "platform": platform.platform(),
        "command": " ".join(["fastssl"] + sys.argv[1:]) if sys.argv else "",
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        git = ["git", "-C", here]
        env["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10).stdout.strip())
    except Exception:
        env["git_commit"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env
