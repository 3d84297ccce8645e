# examples/tour.py -- run from the repository root: python examples/tour.py (7 s on 2 cores)
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
import yaml

import sedma_torch as st

cfg = st.RRAMConfig(
    material="taox_hfox",
    tile_rows=256,
    tile_cols=256,
    dac_bits=8,
    adc_bits=8,
    write_verify_iters=20,
    correction="first_order",
    denoise="adaptive",
    seed=0,
)
layer = st.RRAMLinear(512, 256, config=cfg)  # drop-in for nn.Linear
conv = st.RRAMConv2d(3, 16, 3, padding=1, config=cfg)  # drop-in for nn.Conv2d
images = torch.randn(2, 3, 32, 32)  # an image batch (N, C, H, W)
print(layer(torch.randn(4, 512)).shape, conv(images).shape)  # (4, 256), (2, 16, 32, 32)

workdir = tempfile.mkdtemp()
mem = st.memory.LongTermMemory(f"sqlite:///{workdir}/sedma.db")  # or postgresql+psycopg://...
model = torchvision.models.resnet18()  # random init (no download)
plan = st.rram.plan_partition(model, cfg, memory=mem)  # Eq. 4, remembered per workload
st.convert_(model, cfg, partition=plan, memory=mem)  # in place; λ read/written in mem
print(st.summary(model))  # tiles, crossbars, utilisation
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model(images).sum().backward()  # hardware-aware training (straight-through gradients)
opt.step()  # the changed weights re-program at the next forward
st.to_digital(model)  # back to nn.Linear / nn.Conv2d

A, v = torch.randn(64, 64), torch.randn(64)  # a matrix and a vector
res = st.rram.mvm(A, v, cfg, compare=True)  # one simulated product
print(f"mvm rel. L2 error {res.stats['rel_l2']:.3f}")
y = st.rram.denoise(res.y, lam=0.5)  # (I + lam L^T L)^-1 p, O(n log n)

# layer 2: DDP with the memory-aware hook; here a one-process gloo group (under torchrun,
# every rank calls dist.init_process_group("gloo") instead)
dist.init_process_group("gloo", init_method=f"file://{workdir}/ddp_init", rank=0, world_size=1)
ddp = nn.parallel.DistributedDataParallel(model)
st.distributed.register_memory_aware_hook(ddp)  # top-k peers, deadline per exchange
ddp(images).sum().backward()  # gradients averaged by the hook
dist.destroy_process_group()

# layer 3
workflow = st.deploy.workflow_from_model(model, images)  # agents = top-level modules
deploy_cfg = yaml.safe_load(Path("configs/deploy/default.yaml").read_text())
cluster = st.deploy.Cluster.from_dict(deploy_cfg["cluster"])
placement = st.deploy.optimize_placement(workflow, cluster, lambda_mem=1.0)
manifests = st.deploy.render_manifests(workflow, cluster, placement)
st.deploy.validate_manifests(manifests)  # Kubernetes schema, offline
print(f"{len(manifests)} Kubernetes manifests validated")
mem.close()
shutil.rmtree(workdir)  # the memory file and the DDP rendezvous file
