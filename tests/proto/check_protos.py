#!/usr/bin/env python3
"""Check Outrigger's hand-written Dapr .proto files against the official SDK.

Compiles proto/**/*.proto with grpcio-tools' bundled protoc into a
FileDescriptorSet, loads the descriptors that ship inside the `dapr` Python
package (the oracle), and compares by full name:

  * every message we declare must exist in the SDK; each of our fields must
    exist there with the same number, type, label, type_name, oneof membership,
    proto3-optional flag and JSON name;
  * every enum we declare must exist with exactly the same values and numbers;
  * every RPC we declare must exist with the same input/output types and
    streaming flags.

Fields or methods the SDK has and we leave out are listed for information and
never fail the check. Exits 1 on any mismatch, 0 otherwise.

Usage: python3 tests/proto/check_protos.py [--proto-root DIR] [-v]
Needs only `dapr` and `grpcio-tools` installed in the running interpreter.
"""

import argparse
import importlib
import os
import pkgutil
import sys
import tempfile

try:
    from google.protobuf import descriptor_pb2
    import dapr.version
    import grpc_tools  # noqa: F401
except ImportError as exc:  # pragma: no cover
    sys.exit(f"check_protos.py needs the `dapr` and `grpcio-tools` packages in this Python: {exc}")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SDK_PACKAGES = ("dapr.proto.common.v1", "dapr.proto.runtime.v1")
LABELS = {1: "optional", 2: "required", 3: "repeated"}
TYPES = {v: k[len("TYPE_") :].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def default_json_name(name):
    """protoc's default lowerCamelCase JSON name for a field."""
    out, upper = [], False
    for ch in name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


def index_file(fdp, messages, enums, services):
    """Add every message, enum and service of one FileDescriptorProto, by full name."""
    pkg = "." + fdp.package if fdp.package else ""

    def walk_enum(e, scope):
        enums[scope + "." + e.name] = (e, fdp.name)

    def walk_msg(m, scope):
        full = scope + "." + m.name
        messages[full] = (m, fdp.name)
        for n in m.nested_type:
            walk_msg(n, full)
        for e in m.enum_type:
            walk_enum(e, full)

    for m in fdp.message_type:
        walk_msg(m, pkg)
    for e in fdp.enum_type:
        walk_enum(e, pkg)
    for s in fdp.service:
        services[pkg + "." + s.name] = (s, fdp.name)


def load_sdk():
    """Index the descriptors compiled into the dapr SDK's *_pb2 modules."""
    messages, enums, services = {}, {}, {}
    seen = set()
    for pkg_name in SDK_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.endswith("_pb2"):
                continue
            fd = importlib.import_module(pkg_name + "." + mod.name).DESCRIPTOR
            if fd.name in seen:
                continue
            seen.add(fd.name)
            fdp = descriptor_pb2.FileDescriptorProto()
            fd.CopyToProto(fdp)
            index_file(fdp, messages, enums, services)
    return messages, enums, services


def compile_ours(proto_root):
    """Run grpcio-tools' protoc on our files; return (our file names, all FileDescriptorProtos)."""
    from grpc_tools import protoc
    import grpc_tools

    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = []
    for dirpath, _, names in os.walk(proto_root):
        for n in sorted(names):
            if n.endswith(".proto"):
                files.append(os.path.relpath(os.path.join(dirpath, n), proto_root))
    files.sort()
    if not files:
        sys.exit(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        args = ["protoc", f"-I{proto_root}", f"-I{wkt}", f"--descriptor_set_out={out}", "--include_imports"]
        rc = protoc.main(args + files)
        if rc != 0:
            sys.exit(f"protoc failed (exit {rc}) on {files}")
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    return set(f.replace(os.sep, "/") for f in files), list(fds.file)


def oneof_of(msg, field):
    if field.HasField("oneof_index"):
        return msg.oneof_decl[field.oneof_index].name
    return None


def describe(field, msg):
    return (
        f"#{field.number} {LABELS.get(field.label, field.label)} {TYPES.get(field.type, field.type)}"
        f"{' ' + field.type_name if field.type_name else ''}"
        f"{' oneof=' + oneof_of(msg, field) if oneof_of(msg, field) else ''}"
        f"{' proto3_optional' if field.proto3_optional else ''}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proto-root", default=os.path.join(REPO, "proto"))
    ap.add_argument("-v", "--verbose", action="store_true", help="also list SDK fields/methods we omit")
    opts = ap.parse_args()

    sdk_msgs, sdk_enums, sdk_svcs = load_sdk()
    our_files, fdps = compile_ours(opts.proto_root)
    our_msgs, our_enums, our_svcs = {}, {}, {}
    for fdp in fdps:
        if fdp.name in our_files:
            index_file(fdp, our_msgs, our_enums, our_svcs)

    errors, omitted = [], []
    n_fields = n_methods = n_values = 0

    for full, (msg, fname) in sorted(our_msgs.items()):
        if full not in sdk_msgs:
            errors.append(f"message {full} ({fname}): not in the SDK")
            continue
        smsg, sfile = sdk_msgs[full]
        if msg.options.map_entry != smsg.options.map_entry:
            errors.append(f"message {full}: map_entry {msg.options.map_entry} vs SDK {smsg.options.map_entry}")
        sdk_by_name = {f.name: f for f in smsg.field}
        sdk_by_num = {f.number: f for f in smsg.field}
        for f in msg.field:
            where = f"{full}.{f.name}"
            sf = sdk_by_name.get(f.name)
            if sf is None:
                other = sdk_by_num.get(f.number)
                hint = f" (SDK has #{f.number} as '{other.name}')" if other else ""
                errors.append(f"field {where}: not in the SDK{hint}")
                continue
            n_fields += 1
            ours, theirs = describe(f, msg), describe(sf, smsg)
            if ours != theirs:
                errors.append(f"field {where}: ours {ours} / SDK {theirs}")
            want_json = sf.json_name or default_json_name(sf.name)
            got_json = f.json_name or default_json_name(f.name)
            if want_json != got_json:
                errors.append(f"field {where}: json_name '{got_json}' / SDK '{want_json}'")
        ours_names = {f.name for f in msg.field}
        for sf in smsg.field:
            if sf.name not in ours_names:
                omitted.append(f"field {full}.{sf.name} {describe(sf, smsg)} (SDK file {sfile})")

    for full, (enum, fname) in sorted(our_enums.items()):
        if full not in sdk_enums:
            errors.append(f"enum {full} ({fname}): not in the SDK")
            continue
        senum, _ = sdk_enums[full]
        ours = [(v.name, v.number) for v in enum.value]
        theirs = [(v.name, v.number) for v in senum.value]
        n_values += len(ours)
        if sorted(ours) != sorted(theirs):
            errors.append(f"enum {full}: ours {ours} / SDK {theirs}")

    for full, (svc, fname) in sorted(our_svcs.items()):
        if full not in sdk_svcs:
            errors.append(f"service {full} ({fname}): not in the SDK")
            continue
        ssvc, _ = sdk_svcs[full]
        sdk_methods = {m.name: m for m in ssvc.method}
        for m in svc.method:
            path = f"/{full[1:]}/{m.name}"
            sm = sdk_methods.get(m.name)
            if sm is None:
                errors.append(f"rpc {path}: not in the SDK")
                continue
            n_methods += 1
            ours = (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            theirs = (sm.input_type, sm.output_type, sm.client_streaming, sm.server_streaming)
            if ours != theirs:
                errors.append(f"rpc {path}: ours in/out/cs/ss {ours} / SDK {theirs}")
        ours_names = {m.name for m in svc.method}
        for sm in ssvc.method:
            if sm.name not in ours_names:
                omitted.append(f"rpc /{full[1:]}/{sm.name} (answers UNIMPLEMENTED)")

    if opts.verbose:
        for line in omitted:
            print("omitted:", line)
    for line in errors:
        print("MISMATCH:", line)

    version = getattr(dapr.version, "__version__", "?")
    if errors:
        print(f"{len(errors)} mismatch(es) against dapr SDK {version}")
        return 1
    n_maps = sum(1 for m, _ in our_msgs.values() if m.options.map_entry)
    print(
        f"OK against dapr SDK {version}: {len(our_msgs) - n_maps} messages (+{n_maps} map entries), "
        f"{n_fields} fields, "
        f"{len(our_enums)} enums ({n_values} values), {len(our_svcs)} services, {n_methods} methods match "
        f"({len(omitted)} SDK fields/methods deliberately omitted; -v lists them)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
