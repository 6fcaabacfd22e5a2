"""Reads OpenMetrics text on stdin with prometheus_client's parser (a strict one: it refuses
text without `# EOF`, bad escapes, counters without `_total` and the like) and prints one JSON
object per sample: {"family", "type", "name", "labels", "value"}; a family without samples
(declared, nothing counted yet) prints one object with "value": null."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    if not family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": family.name,
                          "labels": {}, "value": None}))
    for s in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": s.name,
                          "labels": s.labels, "value": s.value}))
