"""`python -m align`: the `align` command, as a module, for launchers that start one (`accelerate launch -m`).

    # two processes on a CPU (gloo): accelerate's own --cpu flag starts one process only
    accelerate launch --multi_gpu --num_processes 2 -m align sft --config recipes/sft/smollm2-135m-lora.yaml
    # GPUs: a config from recipes/accelerate/ (DDP, FSDP, DeepSpeed ZeRO-2/3, two nodes)
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m align dpo --config recipes/dpo/smollm2-135m-lora.yaml

The training stages (sft, rm, dpo, kto, ppo) run under a launcher; any other command refuses to (exit status 2).
"""

import sys

from align.cli import main

sys.exit(main())
