"""The capture side of a snapshot: the job the jumped-to kernel runs, the mailbox, and the orchestration in A."""
