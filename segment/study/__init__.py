"""The skip study: which runs it trains (:mod:`.settings`), training them resumably
(:mod:`.runner`), the fine-detail measures of each model (:mod:`.detail`, :mod:`.analysis`),
the statistics over seeds and cases (:mod:`.statistics`) and the report (:mod:`.report`)."""
