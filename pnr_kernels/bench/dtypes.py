"""The dtype names the bench's command lines and records use, shared by the runner and the
gather benchmark (a leaf module, so that neither imports the other for it)."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
