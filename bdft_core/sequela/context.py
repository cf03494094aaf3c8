"""Build a :class:`~bdft_core.sequela.base.SequelaContext` from a stored run: the attack run's data,
split the way a sequela evaluation needs it.

- members: training images the attacked model trained on, minus the defender's clean split (a
  defense fine-tunes on those, so they would be members of the defended model for another reason)
  and minus every image the attack changed (poisoned or noised). Victim runs (transfer, encoder
  paradigms): the victim's training pool minus the defender's part. A seeded sample of ``n``.
- the test set, seeded permutation: the first ``n`` images are the non-members, the next
  ``n_shadow`` the attacker's pool (shadow models, stealing queries, re-injection samples), the rest
  ``x_test`` (adversarial examples, calibration, fidelity, re-injection ASR). On a small test set the
  three parts shrink to 1/4, 1/2 and at least 1/4 of it.
- the run's attack (already fitted to the data), and a factory for fresh models of the run's
  architecture (input statistics fitted to the attacker's pool, which is what it would have).

Defense runs are resolved to the attack (or victim) run they defend, so a poisoned model and its
defended versions share one context."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import SequelaContext


def _touched_indices(s, cfg) -> torch.Tensor:
    """Training indices the attack poisoned or otherwise changed (standalone attack runs)."""
    from ..attacks.base import Attack, check_rate

    attack, data = s.attack, s.data
    if type(attack).poison is Attack.poison:  # the base rule: computed without poisoning anything
        y = data.y_train.cpu()
        elig = attack.eligible(y)
        n = min(int(round(check_rate(cfg.poison_rate) * len(y))), int(elig.sum()))
        return s.splits.poison_indices(n, elig).cpu()
    p = attack.poison(data.x_train, data.y_train, cfg.poison_rate, s.splits)  # attacks with their own rule
    return torch.cat([p.poison_idx.reshape(-1).cpu(), p.noise_idx.reshape(-1).cpu()]).long()


def context_for(run, store=None, n: int = 1000, n_shadow: int = 4000, clean_fraction: float | None = None,
                setting=None, device: str | None = None, seed: int | None = None) -> SequelaContext:
    """The sequela context of ``run`` (a :class:`~bdft_core.runs.Run` or a run id; defense runs
    resolve to their parent, which needs ``store``). ``n``: members and non-members (each);
    ``n_shadow``: the attacker's pool; ``clean_fraction``: the defender's split to leave out of the
    members (default: the defense run's own, else the project default 20%); ``setting``: a prepared
    :class:`~bdft_core.pipeline.Setting` to reuse (saves loading the data again)."""
    from ..models import build_model
    from ..pipeline import DEFAULT_CLEAN_FRACTION, attack_config_of, setting_for

    if isinstance(run, str):
        if store is None:
            raise ConfigError("a run id needs a run store to load it from")
        run = store.get(run)
    if run.kind == "defense":
        clean_fraction = clean_fraction if clean_fraction is not None else run.config.get("clean_fraction")
        if store is None:
            raise ConfigError(f"run {run.id} is a defense run; pass the run store so that its parent "
                              f"{run.parent} (the poisoned run) can be loaded")
        run = store.get(run.parent)
    if run.kind not in ("attack", "victim"):
        raise ConfigError(f"run {run.id} is a {run.kind} run; a sequela context starts from an attack or victim run")
    if int(n) < 2 or int(n_shadow) < 4:
        raise ConfigError(f"sequela: n must be >= 2 and n_shadow >= 4, got {n} and {n_shadow}")
    clean_fraction = float(clean_fraction if clean_fraction is not None else DEFAULT_CLEAN_FRACTION)
    cfg = attack_config_of(run)
    if run.kind == "attack" and cfg.paradigm == "transfer":
        raise ConfigError(f"run {run.id} is the attacker's upstream model of a transfer run; evaluate the victim run "
                          "(the model defenses start from)")
    if device:
        cfg.device = device
    s = setting or setting_for(run, cfg)
    data = s.data
    seed = int(cfg.seed if seed is None else seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 4242)

    defender = s.defender_indices(clean_fraction).cpu()
    if s.pool is not None:  # a victim's training pool; the defender's images are its first ones
        cand = s.pool.cpu()[len(defender):]
    else:
        cand = s.splits.order()
        excluded = torch.zeros(len(data.y_train), dtype=torch.bool)
        excluded[defender] = True
        excluded[_touched_indices(s, cfg)] = True
        cand = cand[~excluded[cand]]
    if len(cand) < 2:
        raise ConfigError(f"run {run.id}: fewer than 2 training images remain outside the defender's split")
    mem = cand[torch.randperm(len(cand), generator=g)[: int(n)]].to(data.x_train.device)

    t = len(data.y_test)
    if t < 8:
        raise ConfigError(f"sequela: the test set has {t} images; at least 8 are needed")
    perm = torch.randperm(t, generator=g).to(data.x_test.device)
    n_non = min(int(n), t // 4)
    n_sh = min(int(n_shadow), t // 2)
    non, sh, rest = perm[:n_non], perm[n_non:n_non + n_sh], perm[n_non + n_sh:]
    spec = run.model
    shadow_x = data.x_test[sh]

    def new_model():
        m = build_model(spec["name"], spec["num_classes"], spec["channels"], **spec.get("kwargs", {}))
        m.fit_data(shadow_x.cpu())
        return m.to(s.device)

    return SequelaContext(members_x=data.x_train[mem], members_y=data.y_train[mem],
                          nonmembers_x=data.x_test[non], nonmembers_y=data.y_test[non],
                          shadow_x=shadow_x, shadow_y=data.y_test[sh], x_test=data.x_test[rest],
                          y_test=data.y_test[rest], attack=s.attack, new_model=new_model, device=s.device, seed=seed,
                          num_classes=data.num_classes,
                          train_label_smoothing=float(run.config.get("train", {}).get("label_smoothing", 0.2)))
