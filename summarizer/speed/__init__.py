"""Speed equipment, each optional: the switches' resolution, CUDA-graph training steps, packed
rows and varlen attention, lean LoRA dropout, static decoding, merging and compilation."""
