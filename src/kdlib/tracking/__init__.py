"""What a run records: metrics.jsonl, plots and JSON files, and the experiment trackers.

``records`` writes the files of the run directory; ``trackers`` sends the same records to W&B or
TensorBoard when ``logging.trackers`` names them (each tracker's package is imported only then).
"""

from kdlib.tracking.records import MetricsWriter, plot_loss_curves, plot_reward_curves, write_json
from kdlib.tracking.trackers import TRACKERS, RunIdentity, Tracker, Trackers, check_trackers

__all__ = ["MetricsWriter", "TRACKERS", "RunIdentity", "Tracker", "Trackers", "check_trackers", "plot_loss_curves", "plot_reward_curves",
           "write_json"]
