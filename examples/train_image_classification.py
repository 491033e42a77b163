"""Fine-tune an image classifier with ALoRE (the ``alore-train`` command as a script).

    python examples/train_image_classification.py                   # offline DINOv2-S on Fashion-MNIST
    python examples/train_image_classification.py --recipe vtab1k --dataset path/to/vtab_task
    accelerate launch --multi_gpu --num_processes 2 examples/train_image_classification.py --recipe fgvc ...

``python examples/train_image_classification.py --help`` lists every flag;
see docs/training.md.
"""

from alore_peft.training.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
