"""A gRPC client of sluice-enrich not written in Rust (Python grpcio), used by
tests/tests/grpc_api.rs: generates stubs from schemas/enrich.proto, then
calls the API and the standard health and reflection services, and prints
one JSON object with what it saw. Usage: client.py PROTO_DIR ADDR APP IP CHANNEL
"""
import json
import os
import sys
import tempfile

from grpc_tools import protoc
import grpc


def main():
    proto_dir, addr, app, ip, channel = sys.argv[1:6]
    out = tempfile.mkdtemp(prefix="sluice-grpc-py-")
    code = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(proto_dir, "enrich.proto")])
    if code != 0:
        sys.exit(f"protoc failed with {code}")
    sys.path.insert(0, out)
    import enrich_pb2
    import enrich_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    seen = {}
    with grpc.insecure_channel(addr) as ch:
        stub = enrich_pb2_grpc.EnrichStub(ch)
        a = stub.LookupApp(enrich_pb2.LookupAppRequest(app=app), timeout=10)
        seen["app"] = {"known": a.known, "name": a.name, "kind": a.kind}
        g = stub.LookupGeo(enrich_pb2.LookupGeoRequest(ip=ip), timeout=10)
        seen["geo"] = {"country": g.country, "region": g.region}
        c = stub.LookupChannel(enrich_pb2.LookupChannelRequest(channel=channel), timeout=10)
        seen["channel"] = c.group
        try:
            stub.LookupGeo(enrich_pb2.LookupGeoRequest(ip="not an ip"), timeout=10)
            seen["bad_ip"] = "OK"
        except grpc.RpcError as e:
            seen["bad_ip"] = e.code().name
        h = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="sluice.enrich.v1.Enrich"), timeout=10)
        seen["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)
        # Server reflection (v1, served under the v1alpha name by tonic too when asked).
        try:
            from grpc_reflection.v1 import reflection_pb2 as r1, reflection_pb2_grpc as r1g
            resp = r1g.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([r1.ServerReflectionRequest(list_services="")]), timeout=10)
        except ImportError:
            resp = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = []
        for r in resp:
            services += [s.name for s in r.list_services_response.service]
        seen["services"] = sorted(services)
    print(json.dumps(seen, sort_keys=True))


if __name__ == "__main__":
    main()
