"""capture: takes leads from partners (signed Kafka messages) and web forms, and answers every
partner message."""
