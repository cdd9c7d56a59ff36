"""The human feedback loop: labeling tasks on the current policy's samples, a label store,
a labeling page, labelers, and the loop that retrains the reward model during RL
(DESIGN.md section 5, "Human feedback loop")."""
