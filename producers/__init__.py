"""Publishing requests to eglo: a confirming Publisher, file reading and sample generation."""
