"""Reading the teacher's answers: the checked parser, the fast path and its compiled core."""
