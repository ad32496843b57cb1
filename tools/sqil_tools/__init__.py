"""Python edges of sqil: benchmark tasks, experts, demonstrations, BC training, evaluation."""
