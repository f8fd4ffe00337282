"""Calibration for block-streamed quantization: statistics collectors, stats dirs,
checkpoint reading on the meta device, and the block streamer.

* :mod:`.collectors` — ``"hessian"`` (XᵀX of each Linear's input, float64, with
  the row count), ``"act_stats"`` (per input channel max |x|, mean |x|, mean x),
  ``"fisher"`` (squared LM-loss gradients, a whole-model pre-pass);
* :mod:`.stats_dir` — statistics saved per layer as safetensors and reused when
  the model and calibration data match;
* :mod:`.checkpoint` — :func:`open_on_meta` and lazy safetensors reading;
* :mod:`.blocks` — decoder-block discovery and (de)materialisation;
* :mod:`.streamer` — :func:`stream_quantize`, what ``sqllm.quantize`` runs when it streams.
"""
from .blocks import block_linears, find_decoder_blocks
from .checkpoint import SafetensorsCheckpoint, is_meta_model, open_on_meta
from .collectors import (COLLECTORS, ActStatsCollector, Collector, FisherCollector,
                         HessianCollector, get_collector)
from .stats_dir import StatsDir
from .streamer import BlockInputs, capture_block_inputs, stream_quantize

__all__ = ["COLLECTORS", "ActStatsCollector", "BlockInputs", "Collector", "FisherCollector",
           "HessianCollector", "SafetensorsCheckpoint", "StatsDir", "block_linears",
           "capture_block_inputs", "find_decoder_blocks", "get_collector", "is_meta_model",
           "open_on_meta", "stream_quantize"]
