"""Print the versions an environment runs with (CI prints this before the tests)."""

from importlib import metadata
import platform

PACKAGES = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "tokenizers", "trl"]

print(f"python {platform.python_version()} on {platform.machine()}")
for name in PACKAGES:
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} (not installed)")
