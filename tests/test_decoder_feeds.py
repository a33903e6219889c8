"""The feeds of one decoder step, shared by the export's checks (ort_attention's probe, int8 calibration) and the
targets: golden values on a hand-made graph's inputs."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from sparsekd_deploy.exporters.decoder_feeds import CacheInput, decoder_feed, graph_caches, step_feed


def _graph(cache_type=TensorProto.FLOAT16):
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("past_key_values.0.key", cache_type, ["batch", 3, "past", 4]),
              helper.make_tensor_value_info("past_key_values.0.value", cache_type, ["batch", 3, "past", 4])]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 7])
    return helper.make_graph([], "g", inputs, [out])


def test_decoder_feed_counts_positions_after_the_past():
    feed = decoder_feed(np.array([[5, 6], [7, 8]], np.int64), 3)
    np.testing.assert_array_equal(feed["attention_mask"], np.ones((2, 5), np.int64))
    np.testing.assert_array_equal(feed["position_ids"], [[3, 4], [3, 4]])
    assert feed["position_ids"].flags.writeable  # a copy, not a read-only broadcast view


def test_prompt_pass_of_a_graph_without_positions_has_empty_caches_of_its_type():
    graph = _graph()
    caches = graph_caches(graph)
    assert caches == {"past_key_values.0.key": CacheInput(3, 4, np.float16),
                      "past_key_values.0.value": CacheInput(3, 4, np.float16)}
    assert graph_caches(_graph(TensorProto.FLOAT))["past_key_values.0.key"].dtype is np.float32
    feed = step_feed(np.ones((2, 6), np.int64), 0, {i.name for i in graph.input}, caches)
    assert list(feed) == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    assert feed["past_key_values.0.key"].shape == (2, 3, 0, 4) and feed["past_key_values.0.key"].dtype == np.float16


def test_a_decode_step_feeds_the_given_past():
    caches = {"past_key_values.0.key": CacheInput(3, 4, np.float32)}
    past = {"past_key_values.0.key": np.full((1, 3, 6, 4), 2.0, np.float32)}
    feed = step_feed(np.array([[9]], np.int64), 6, {"input_ids", "attention_mask", "position_ids"}, caches, past)
    assert feed["past_key_values.0.key"] is past["past_key_values.0.key"]
    np.testing.assert_array_equal(feed["position_ids"], [[6]])
    assert feed["attention_mask"].shape == (1, 7)
