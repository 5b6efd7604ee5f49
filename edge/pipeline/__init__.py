"""From a camera frame to a decision: the capture and inference threads (edge.pipeline.loop.loop: the
ModelHolder that hot-swaps models, InferenceResult, SampledFrame) and the sampler that picks the
frames worth a person's look (edge.pipeline.loop.sampler)."""
