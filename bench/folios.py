#!/usr/bin/env python3
"""bench/folios.py PID (bench/rss-where.sh): for each file mapping of the binary (r-xp, r--p), resident pages and the page-cache
folio sizes they belong to (pagemap PFNs, kpageflags COMPOUND_HEAD/TAIL)."""
import sys, struct, collections, os
pid = sys.argv[1]
exe = os.readlink(f"/proc/{pid}/exe")
pm = open(f"/proc/{pid}/pagemap", "rb"); kf = open("/proc/kpageflags", "rb")
def flags(pfn):  # a short read (past the end of kpageflags) counts as no flags: not a tail page
    kf.seek(pfn * 8); b = kf.read(8)
    return struct.unpack("<Q", b)[0] if len(b) == 8 else 0
HEAD, TAIL = 1 << 15, 1 << 16
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) < 6 or f[5] != exe or f[1] not in ("r-xp", "r--p"): continue
    s, e = (int(x, 16) for x in f[0].split("-"))
    pm.seek(s // 4096 * 8); data = pm.read((e - s) // 4096 * 8)
    sizes = collections.Counter(); heads = {}; present = 0
    for i in range(0, len(data), 8):
        v = struct.unpack_from("<Q", data, i)[0]
        if not v >> 63: continue
        present += 1; pfn = v & ((1 << 55) - 1)
        fl = flags(pfn)
        if not (fl & (HEAD | TAIL)): sizes[4] += 4; continue
        h = pfn
        while flags(h) & TAIL: h -= 1
        if h not in heads:
            n = 1
            while flags(h + n) & TAIL: n += 1
            heads[h] = n
        sizes[heads[h] * 4] += 4
    print(f"{f[1]} {os.path.basename(exe)}: {present * 4} KiB resident; by folio size KiB: " +
          ", ".join(f"{k}: {v} KiB" for k, v in sorted(sizes.items())))
