ALTER TABLE `audience_sync_planner`.`as_snap_pro_plan_6` RENAME TO `as_snap_pro_plan_7`
