"""fastssl against the libraries it mirrors (lightly, open_clip, torchvision, timm), installed
for real. Run where they import (`.ci/run`'s peer stage); skipped elsewhere."""
