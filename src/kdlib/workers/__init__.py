"""Workers: plain classes for the teacher, student and rollout roles, placed by a launcher."""
