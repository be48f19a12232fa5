#!/usr/bin/env python3
"""Write request to std-writer-agent with pika, following docs/protocol.md only.

usage: pika_write.py AMQP_URL TAG OUTPUT_FILE N_IMAGES
Prints one JSON line per status of the request; exits 0 on request_success, 1 on request_fail.
"""
import json
import sys
import uuid

import pika

url, tag, output_file, n_images = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
# Same declarations as every std_daq service (pika defaults: not durable, not auto-deleted).
channel.exchange_declare(exchange="request", exchange_type="topic")
channel.exchange_declare(exchange="status", exchange_type="fanout")
channel.exchange_declare(exchange="kill", exchange_type="topic")

# Listen to the status exchange BEFORE sending, so no status can be missed.
status_queue = str(uuid.uuid4())
channel.queue_declare(queue=status_queue, exclusive=True, auto_delete=True)
channel.queue_bind(queue=status_queue, exchange="status")

request_id = str(uuid.uuid4())
channel.confirm_delivery()
channel.basic_publish(
    exchange="request",
    routing_key=tag,
    body=json.dumps({"output_file": output_file, "n_images": n_images}),
    properties=pika.BasicProperties(correlation_id=request_id,
                                    content_type="application/json"),
    mandatory=True,  # raises pika.exceptions.UnroutableError if no agent listens on `tag`
)

for method, properties, body in channel.consume(status_queue, auto_ack=True,
                                                inactivity_timeout=60):
    if method is None:
        sys.exit("no status for 60 s")
    if properties.correlation_id != request_id:
        continue  # the status exchange carries every request's statuses
    headers = properties.headers or {}
    action, message = headers.get("action"), headers.get("message")
    status = json.loads(body)
    print(json.dumps({"action": action, "message": message,
                      "images_written": status["images_written"]}), flush=True)
    if action == "request_success":
        sys.exit(0)
    if action == "request_fail":
        sys.exit(1)
