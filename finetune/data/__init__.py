"""The benchmarks and the template: one module per benchmark (`pubmedqa`, `medmcqa`, `medqa`) reading its files
in their original formats or its Hub copy into `records.QAItem`s, the `registry` that finds them by name, and the
ChatML system/question/answer template (`chatml`) that training and evaluation share."""
