#!/usr/bin/env python
"""Fine-tune only the projector LoRA of a SHIRG-LaViDa model: the same run as `shirg-hf train`.

    # seconds on a CPU: a random tiny model and a synthetic shapes/colours/text data set
    python examples/train_lora.py --base tiny --budgets full,64,48,32 --output_dir runs/tiny --max_steps 20

    # a saved model folder (e.g. from `shirg-hf convert-lavida`) on your data, 8 GPUs
    torchrun --nproc_per_node 8 examples/train_lora.py --base ./shirg-lavida-8b --dataset ./my_vqa \\
        --output_dir runs/projector-lora --bf16 True --per_device_train_batch_size 4 --learning_rate 2e-4

Every option is documented by `python examples/train_lora.py --help` (script options plus TrainingArguments).
"""

import sys

from shirg_hf.train import lora_sha256, main  # noqa: F401  (lora_sha256: the DDP test's adapter digest)

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train_lora.py: error: {error}", file=sys.stderr)
        sys.exit(2)
