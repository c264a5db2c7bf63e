#!/usr/bin/env python3
"""Read-only: prints each GPU's MIG GPU-instance profile table as NVML reports it (profile
index, id, slices, instance count, memory, possible placements). NVML answers these queries
with MIG disabled. This script never changes MIG mode and never creates or destroys
instances. Needs nvidia-ml-py (pynvml)."""
import ctypes
import json
import pynvml as n

n.nvmlInit()
out = {"driver": n.nvmlSystemGetDriverVersion(), "gpus": []}
for i in range(n.nvmlDeviceGetCount()):
    h = n.nvmlDeviceGetHandleByIndex(i)
    pci = n.nvmlDeviceGetPciInfo(h)
    try:
        cur, pend = n.nvmlDeviceGetMigMode(h)
    except n.NVMLError as e:
        cur, pend = str(e), None
    gpu = {"index": i, "name": n.nvmlDeviceGetName(h), "pci_device_id": hex(pci.pciDeviceId),
           "memory_mib": n.nvmlDeviceGetMemoryInfo(h).total // (1 << 20), "mig_mode": [cur, pend], "profiles": []}
    for p in range(n.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = n.nvmlDeviceGetGpuInstanceProfileInfo(h, p)
        except n.NVMLError as e:
            gpu["profiles"].append({"index": p, "error": str(e)})
            continue
        row = {"index": p, "id": info.id, "slices": info.sliceCount, "instances": info.instanceCount,
               "memory_mib": info.memorySizeMB, "sms": info.multiprocessorCount}
        try:
            # The binding takes ctypes out-parameters: an array and its capacity.
            arr = (n.c_nvmlGpuInstancePlacement_t * 16)()
            cnt = ctypes.c_uint(16)
            n.nvmlDeviceGetGpuInstancePossiblePlacements(h, info.id, arr, ctypes.byref(cnt))
            row["placements"] = [(arr[k].start, arr[k].size) for k in range(cnt.value)]
        except (n.NVMLError, AttributeError, TypeError) as e:
            row["placements"] = str(e)
        gpu["profiles"].append(row)
    out["gpus"].append(gpu)
print(json.dumps(out, indent=1))
