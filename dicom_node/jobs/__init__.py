"""Jobs: a ready study → jobs by the policy, the job state machine, running a pipeline on a
job, and the review of held outputs. Delivery is handed to it (see ``handover``), never imported."""
