"""An SDS client built on Python's grpcio with a default channel: gRPC-core, as a user would run it.

Usage: grpcio_client.py TARGET RPC REQUEST_HEX
  TARGET       a grpcio target: unix:/path/sds.sock, 127.0.0.1:8234, ...
  RPC          fetch | stream | delta
  REQUEST_HEX  the encoded request message (DiscoveryRequest or DeltaDiscoveryRequest), hex

Prints one JSON object: {"response": HEX} with the first response message, or
{"code": "PERMISSION_DENIED", "details": "..."} when the call fails. Messages are passed as raw bytes, so
the test (in Rust) encodes and decodes them; this script needs nothing but grpcio.
"""

import json
import sys

import grpc

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService/"
METHODS = {"fetch": "FetchSecrets", "stream": "StreamSecrets", "delta": "DeltaSecrets"}


def main():
    target, rpc, request_hex = sys.argv[1:4]
    request = bytes.fromhex(request_hex)
    raw = lambda b: b
    with grpc.insecure_channel(target) as channel:
        method = SERVICE + METHODS[rpc]
        try:
            if rpc == "fetch":
                call = channel.unary_unary(method, request_serializer=raw, response_deserializer=raw)
                response = call(request, timeout=10)
            else:
                call = channel.stream_stream(method, request_serializer=raw, response_deserializer=raw)
                responses = call(iter([request]), timeout=10)
                response = next(responses)
                responses.cancel()
            print(json.dumps({"response": response.hex()}))
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    main()
