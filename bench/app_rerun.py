"""How long a rerun of each dashboard page takes with nothing running (the issue asks for well
under a second). Uses Streamlit's AppTest, which runs the page script as the server would, minus
the browser. Run: ``python bench/app_rerun.py`` (optionally with BDFT_DATA_DIR set)."""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["home", "attack_lab", "defense_lab", "runs"]


def main(repeats: int = 5) -> None:
    os.environ.setdefault("BDFT_RUNS_DIR", tempfile.mkdtemp(prefix="bdft-bench-"))
    sys.path.insert(0, str(ROOT))
    from bdft_core.pipeline import AttackConfig, run_attack, run_defense
    from bdft_core.runs import RunStore

    store = RunStore()
    if not store.list():  # one poisoned run with a defense, so every page has something to draw
        run, model = run_attack(AttackConfig(dataset="digits", epochs=2.0), store=store)
        run_defense(run, "sft", store=store, model=model)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    t0 = time.perf_counter()
    at.run()
    print(f"first load (loads and caches the dataset): {time.perf_counter() - t0:.2f} s")
    print(f"{'page':<12} {'median rerun':>13} {'max':>8}")
    for page in PAGES:
        at.switch_page(f"pages/{page}.py").run()
        if page == "runs":  # compare the stored runs: the heaviest view
            at.multiselect(key="runs_select").set_value([r["id"] for r in store.list()]).run()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t)
        assert not at.exception, [e.value for e in at.exception]
        print(f"{page:<12} {statistics.median(times):>11.3f} s {max(times):>6.3f} s")


if __name__ == "__main__":
    main()
